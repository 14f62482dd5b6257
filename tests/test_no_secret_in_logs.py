"""No secret in any log line at any level: DEBUG on for every logger (ours and the libraries':
websockets logs handshake headers, httpx/httpcore their calls), a real relay, our agent
attaching and serving a request, then every record is searched for every secret in full."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from support import free_port, health_app

from taskapp_notebook import InProcessTaskApp
from taskapp_notebook.relay import RelayServer
from taskapp_notebook.tunnels.synthtunnel import SynthTunnel

RELAY_KEY = "relay-key-that-must-not-leak-0123456789"
APP_KEY = "app-key-that-must-not-leak-9876543210"


class Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def every_log_line() -> Iterator[Everything]:
    handler = Everything()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    saved = root.level
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    levels = [(lg, lg.level) for lg in loggers]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for lg in loggers:
        lg.setLevel(logging.NOTSET)  # inherit DEBUG
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
        for lg, level in levels:
            lg.setLevel(level)


def test_no_token_or_key_in_debug_logs_of_relay_and_agent(
    every_log_line: Everything, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RelayServer(api_keys=[RELAY_KEY]) as relay:
        monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
        monkeypatch.setenv("SYNTH_API_KEY", RELAY_KEY)
        app = InProcessTaskApp(
            app=health_app(), serve_on="thread", port=free_port(), api_key=APP_KEY
        )
        with app:
            assert app.url and app.task_app_worker_token
            worker = app.task_app_worker_token
            tunnel = app.tunnel
            assert isinstance(tunnel, SynthTunnel) and tunnel.lease is not None
            agent_token = tunnel.lease.agent_token
            r = httpx.get(f"{app.url}/health", headers={"Authorization": f"Bearer {worker}"})
            assert r.status_code == 200
    lines = every_log_line.lines
    assert any("websockets" in line for line in lines)  # the handshake was logged at DEBUG
    for secret in (RELAY_KEY, APP_KEY, worker, agent_token):
        leaked = [line for line in lines if secret in line]
        assert not leaked, f"secret ending {secret[-4:]} logged: {leaked[:3]}"
