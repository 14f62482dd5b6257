"""InProcessTaskApp against real uvicorn servers on 127.0.0.1.

Covers: argument validation (the seed's ValueError / FileNotFoundError / RuntimeError
contract), start/stop in every face (sync ``with``, ``async with``, ``start()``/``stop()``)
and ``serve_on`` mode, state transitions, callbacks, logging, API-key resolution and
masking, request stats, health and lifespan failures (with a check that nothing is left
behind), preconfigured URLs with verification, and SynthTunnel's preflight.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi import FastAPI, Request, Response
from support import free_port, port_is_free

from taskapp_notebook import AppState, InProcessTaskApp, registry
from taskapp_notebook.errors import (
    HealthCheckError,
    InvalidParameterError,
    PortInUseError,
    ServerStartError,
    StartError,
    TaskAppNotFoundError,
    TunnelError,
    TunnelVerificationError,
)

# ---------------------------------------------------------------------------- helpers


def make_app(
    *,
    health_status: int = 200,
    require_key: str | None = None,
    startup_error: str | None = None,
    seen: list[dict[str, str]] | None = None,
) -> FastAPI:
    """A plain FastAPI task app.

    ``health_status``: what /health answers. ``require_key``: /health answers 401 unless
    ``X-API-Key`` equals it. ``startup_error``: the lifespan startup raises RuntimeError
    with this text. ``seen``: headers of every /health request are appended to it.
    A gateway header ``X-Gateway-Token`` other than ``gw-secret`` is refused with 403.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if startup_error is not None:
            raise RuntimeError(startup_error)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health(request: Request) -> Response:
        if seen is not None:
            seen.append(dict(request.headers))
        gateway = request.headers.get("x-gateway-token")
        if gateway is not None and gateway != "gw-secret":
            return Response(status_code=403)
        if require_key is not None and request.headers.get("x-api-key") != require_key:
            return Response(status_code=401)
        return Response('{"healthy": true}', status_code=health_status,
                        media_type="application/json")

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> Response:
        return Response("nope", status_code=500)

    return app


def local_app(port: int, **kwargs: Any) -> InProcessTaskApp:
    """An InProcessTaskApp with tunnel_mode='local' on ``port`` (no port hunting)."""
    kwargs.setdefault("app", make_app())
    kwargs.setdefault("auto_find_port", False)
    kwargs.setdefault("tunnel_mode", "local")
    return InProcessTaskApp(port=port, **kwargs)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, trust_env=False, timeout=10, **kwargs)


@dataclass(frozen=True)
class Resources:
    """What a failed or finished start must not leave behind."""

    threads: frozenset[threading.Thread]
    fds: int
    tasks: frozenset[asyncio.Task[Any]] | None

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        try:
            tasks: frozenset[asyncio.Task[Any]] | None = frozenset(asyncio.all_tasks())
        except RuntimeError:  # no running loop
            tasks = None
        alive = frozenset(t for t in threading.enumerate() if t.is_alive())
        return cls(alive, psutil.Process().num_fds(), tasks)

    def assert_same_as(self, before: Resources) -> None:
        new_threads = self.threads - before.threads
        assert not new_threads, f"threads left behind: {sorted(t.name for t in new_threads)}"
        assert self.fds == before.fds, f"open fds: {before.fds} before, {self.fds} after"
        if before.tasks is not None:
            assert self.tasks is not None
            new_tasks = self.tasks - before.tasks
            assert not new_tasks, f"asyncio tasks left behind: {new_tasks}"


def assert_nothing_left(before: Resources, app: InProcessTaskApp, port: int) -> None:
    Resources.now().assert_same_as(before)
    assert port_is_free(port), f"port {port} still bound"
    assert app not in registry.running()


# ---------------------------------------------------------------------------- validation


def test_no_input_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"Provide exactly one of app, config.*got none"):
        InProcessTaskApp(tunnel_mode="local")


def test_two_inputs_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="exactly one of.*got app and config_factory"):
        InProcessTaskApp(app=make_app(), config_factory=dict, tunnel_mode="local")  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [0, 80, 1023, 65536, 100_000, -1])
def test_port_out_of_range_is_a_value_error(port: int) -> None:
    with pytest.raises(ValueError, match=r"range \[1024, 65535\].*pick e\.g\. 8114"):
        InProcessTaskApp(app=make_app(), port=port, tunnel_mode="local")


@pytest.mark.parametrize("port", ["8114", 8114.0, True, None])
def test_port_of_wrong_type_is_a_value_error(port: Any) -> None:
    with pytest.raises(ValueError, match=r"Port must be an int in \[1024, 65535\]"):
        InProcessTaskApp(app=make_app(), port=port, tunnel_mode="local")


@pytest.mark.parametrize("host", ["192.168.1.10", "example.com", "::", "", "127.0.0.2"])
def test_host_not_allowed_is_a_value_error(host: str) -> None:
    with pytest.raises(ValueError, match=r"Host must be one of '127\.0\.0\.1'.*tunnel instead"):
        InProcessTaskApp(app=make_app(), host=host, tunnel_mode="local")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
def test_allowed_hosts_are_accepted(host: str) -> None:
    assert InProcessTaskApp(app=make_app(), host=host, tunnel_mode="local").host == host


@pytest.mark.parametrize("mode", ["ngrok", "", "cloudflare"])
def test_unknown_tunnel_mode_is_a_value_error(mode: str) -> None:
    with pytest.raises(ValueError, match=r"tunnel_mode must be one of 'synthtunnel', 'quick'"):
        InProcessTaskApp(app=make_app(), tunnel_mode=mode)


@pytest.mark.parametrize(
    ("given", "canonical"),
    [("LOCAL", "local"), (" Quick ", "quick"), ("Preconfigured", "preconfigured")],
)
def test_tunnel_mode_is_case_insensitive(given: str, canonical: str) -> None:
    app = InProcessTaskApp(app=make_app(), tunnel_mode=given, preconfigured_url="http://x")
    assert app.tunnel_mode == canonical


@pytest.mark.parametrize(
    ("backend", "mode"),
    [
        ("synth_tunnel", "synthtunnel"),
        ("SYNTH_TUNNEL", "synthtunnel"),
        ("SynthTunnel", "synthtunnel"),
        ("cloudflare_quick", "quick"),
        ("Cloudflare_Quick", "quick"),
        ("managed", "named"),
        ("MANAGED", "named"),
        ("cloudflare_managed", "named"),
        ("localhost", "local"),
        ("LocalHost", "local"),
        ("named", "named"),
    ],
)
def test_tunnel_backend_aliases_are_accepted(backend: str, mode: str) -> None:
    app = InProcessTaskApp(app=make_app(), tunnel_mode="quick", tunnel_backend=backend)
    assert app.tunnel_mode == mode  # the backend overrides tunnel_mode


def test_unknown_tunnel_backend_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"Unknown tunnel mode 'ngrok'\. Use one of synthtunnel"):
        InProcessTaskApp(app=make_app(), tunnel_backend="ngrok")


def test_missing_task_app_path_is_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.py"
    with pytest.raises(FileNotFoundError, match=r"does not exist .*looked at") as info:
        InProcessTaskApp(task_app_path=missing, tunnel_mode="local")
    assert isinstance(info.value, TaskAppNotFoundError)
    assert str(missing) in str(info.value)


def test_task_app_path_that_is_not_py_is_a_value_error(tmp_path: Path) -> None:
    text = tmp_path / "app.txt"
    text.write_text("app = None\n")
    with pytest.raises(ValueError, match=r"must be a \.py file"):
        InProcessTaskApp(task_app_path=text, tunnel_mode="local")
    with pytest.raises(ValueError, match=r"is a directory; pass the \.py file"):
        InProcessTaskApp(task_app_path=tmp_path, tunnel_mode="local")


def test_preconfigured_without_url_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"needs preconfigured_url= .*e\.g\. preconfigured_url"):
        InProcessTaskApp(app=make_app(), tunnel_mode="preconfigured")


def test_preconfigured_url_without_scheme_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"must start with http:// or https://"):
        InProcessTaskApp(app=make_app(), tunnel_mode="preconfigured", preconfigured_url="x.io")


def test_preconfigured_auth_header_without_token_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="preconfigured_auth_header and preconfigured_auth_token"):
        InProcessTaskApp(
            app=make_app(),
            tunnel_mode="preconfigured",
            preconfigured_url="https://x.io",
            preconfigured_auth_header="X-Token",
        )


@pytest.mark.parametrize("timeout", [0, -1.5, "30", True, None, float("nan"), float("inf")])
def test_bad_health_check_timeout_is_a_value_error(timeout: Any) -> None:
    with pytest.raises(ValueError, match="health_check_timeout must be a positive, finite"):
        InProcessTaskApp(app=make_app(), tunnel_mode="local", health_check_timeout=timeout)


@pytest.mark.parametrize("serve_on", ["process", "", None, "THREAD"])
def test_bad_serve_on_is_a_value_error(serve_on: Any) -> None:
    with pytest.raises(ValueError, match="serve_on must be 'auto', 'loop' or 'thread'"):
        InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on=serve_on)


def test_non_callable_callback_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="on_start must be callable"):
        InProcessTaskApp(app=make_app(), tunnel_mode="local", on_start="print")  # type: ignore[arg-type]


def test_serve_on_loop_without_running_loop_says_what_to_do(port: int) -> None:
    app = local_app(port, serve_on="loop")
    with pytest.raises(ValueError, match=r"needs a running event loop.*serve_on='thread'"):
        app.start()
    assert app.state is AppState.STOPPED
    assert port_is_free(port)


# ---------------------------------------------------------------------------- start / stop


def test_sync_with_serves_in_a_thread_and_frees_the_port(port: int) -> None:
    with local_app(port, serve_on="thread") as app:
        assert app.is_running and app.state is AppState.RUNNING
        assert app.serve_on == "thread"
        assert app.port == port
        assert app.url == f"http://127.0.0.1:{port}"
        assert app.loop is not None and app.loop.is_running()
        assert get(app.url + "/ok").json() == {"ok": True}
        assert not port_is_free(port)
    assert app.state is AppState.STOPPED
    assert app.url is None
    assert port_is_free(port)


def test_default_serve_on_outside_a_kernel_is_thread(port: int) -> None:
    with local_app(port) as app:
        assert app.serve_on == "thread"


async def test_async_with_on_the_callers_loop(port: int) -> None:
    async with local_app(port, serve_on="loop") as app:
        assert app.serve_on == "loop"
        assert app.loop is asyncio.get_running_loop()
        assert any(t.get_name() == f"taskapp-server:{port}" for t in asyncio.all_tasks())
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.get(f"{app.url}/ok")
        assert response.json() == {"ok": True}
    assert app.state is AppState.STOPPED
    assert not any(t.get_name() == f"taskapp-server:{port}" for t in asyncio.all_tasks())
    assert port_is_free(port)


async def test_async_with_in_a_thread(port: int) -> None:
    async with local_app(port, serve_on="thread") as app:
        assert app.loop is not asyncio.get_running_loop()
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{app.url}/ok")).status_code == 200
    assert app.state is AppState.STOPPED
    assert port_is_free(port)


async def test_async_default_serve_on_outside_a_kernel_is_thread(port: int) -> None:
    async with local_app(port) as app:
        assert app.serve_on == "thread"


def test_start_and_stop_return_and_stop_is_idempotent(port: int) -> None:
    app = local_app(port)
    app.stop()  # before start: nothing to do
    assert app.state is AppState.STOPPED
    assert app.start() is app
    assert app.start() is app  # already running: a no-op
    assert get(f"{app.local_url}/ok").status_code == 200
    app.stop()
    app.stop()
    assert app.state is AppState.STOPPED
    assert port_is_free(port)


async def test_astop_is_idempotent(port: int) -> None:
    app = local_app(port, serve_on="loop")
    await app.astart()
    await app.astop()
    await app.astop()
    app.stop()
    assert app.state is AppState.STOPPED
    assert port_is_free(port)


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_restart_after_stop_on_the_same_port(port: int, serve_on: str) -> None:
    app = local_app(port, serve_on=serve_on)
    for _ in range(3):
        async with app:
            assert app.port == port
            async with httpx.AsyncClient(trust_env=False) as client:
                assert (await client.get(f"{app.url}/ok")).status_code == 200
        assert port_is_free(port)


def test_restart_with_sync_start_stop_on_the_same_port(port: int) -> None:
    app = local_app(port)
    for _ in range(3):
        app.start()
        assert app.port == port and get(f"{app.url}/ok").status_code == 200
        app.stop()
        assert port_is_free(port)


def test_a_new_instance_reuses_a_just_stopped_port(port: int) -> None:
    with local_app(port) as first:
        get(f"{first.url}/ok")  # leave a connection in TIME_WAIT
    with local_app(port) as second:
        assert second.port == port


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_state_transitions_seen_by_listeners(port: int, serve_on: str) -> None:
    seen: list[AppState] = []
    app = local_app(port, serve_on=serve_on)
    app.add_listener(lambda a: seen.append(a.state))
    async with app:
        assert seen == [AppState.STARTING, AppState.RUNNING]
    assert seen == [AppState.STARTING, AppState.RUNNING, AppState.STOPPING, AppState.STOPPED]


def test_failed_start_transitions_to_failed(port: int) -> None:
    seen: list[AppState] = []
    app = local_app(port, app=make_app(health_status=503), health_check_timeout=0.2)
    app.add_listener(lambda a: seen.append(a.state))
    with pytest.raises(HealthCheckError):
        app.start()
    assert seen == [AppState.STARTING, AppState.FAILED]
    assert app.error is not None and "HealthCheckError" in app.error
    app.stop()  # nothing to stop: no further transition
    assert seen == [AppState.STARTING, AppState.FAILED]


def test_a_raising_listener_does_not_break_the_app(port: int) -> None:
    def bad(app: InProcessTaskApp) -> None:
        raise RuntimeError("listener bug")

    app = local_app(port)
    app.add_listener(bad)
    with app:
        assert app.is_running
    assert app.state is AppState.STOPPED


def test_removed_listener_is_not_called(port: int) -> None:
    seen: list[AppState] = []

    def listener(app: InProcessTaskApp) -> None:
        seen.append(app.state)

    app = local_app(port)
    app.add_listener(listener)
    app.remove_listener(listener)
    app.remove_listener(listener)  # removing twice is fine
    with app:
        pass
    assert seen == []


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_on_start_and_on_stop_called_once_with_the_instance(
    port: int, serve_on: str
) -> None:
    calls: list[tuple[str, InProcessTaskApp, AppState]] = []
    app = local_app(
        port,
        serve_on=serve_on,
        on_start=lambda a: calls.append(("start", a, a.state)),
        on_stop=lambda a: calls.append(("stop", a, a.state)),
    )
    async with app:
        assert calls == [("start", app, AppState.RUNNING)]
    await app.astop()
    assert calls == [("start", app, AppState.RUNNING), ("stop", app, AppState.RUNNING)]


def test_on_stop_not_called_when_start_failed(port: int) -> None:
    calls: list[str] = []
    app = local_app(
        port,
        app=make_app(health_status=503),
        health_check_timeout=0.1,
        on_start=lambda a: calls.append("start"),
        on_stop=lambda a: calls.append("stop"),
    )
    with pytest.raises(HealthCheckError):
        app.start()
    app.stop()
    assert calls == []


def test_raising_callbacks_are_logged_and_ignored(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    def on_start(app: InProcessTaskApp) -> None:
        raise ValueError("start callback bug")

    def on_stop(app: InProcessTaskApp) -> None:
        raise KeyError("stop callback bug")

    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    app = local_app(port, on_start=on_start, on_stop=on_stop)
    with app:
        assert app.is_running
        assert get(f"{app.url}/ok").status_code == 200
    assert app.state is AppState.STOPPED
    assert port_is_free(port)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    texts = [r.getMessage() for r in warnings]
    assert any(t.startswith("on_start callback") and "raised" in t for t in texts), texts
    assert any(t.startswith("on_stop callback") and "raised" in t for t in texts), texts
    errors = {type(r.exc_info[1]) for r in warnings if r.exc_info}
    assert {ValueError, KeyError} <= errors


def test_lifecycle_is_logged_at_info(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="taskapp_notebook")
    with local_app(port, name="demo"):
        pass
    ours = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("taskapp_notebook") and r.levelno == logging.INFO
    ]
    expected = [
        "Starting task app 'demo'",
        f"Task app 'demo' running at http://127.0.0.1:{port}",
        "Stopping task app 'demo'",
        "Task app 'demo' stopped",
    ]
    for fragment in expected:
        assert any(fragment in line for line in ours), (fragment, ours)


def test_port_checks_and_health_checks_are_logged_at_debug(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taskapp_notebook")
    with local_app(port):
        pass
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(f"Bound 127.0.0.1:{port}" in line for line in debug), debug
    assert any("Health check" in line for line in debug), debug


# ---------------------------------------------------------------------------- api key


SECRET = "sk-test-0123456789-abcdefgh-SECRET-wxyz"


def test_api_key_is_masked_in_repr_and_snapshot(port: int) -> None:
    app = local_app(port, api_key=SECRET)
    for text in (repr(app), json.dumps(app.snapshot(), ensure_ascii=False)):
        assert SECRET not in text
        assert "…wxyz" in text
    with app:
        snapshot = app.snapshot()
        text = repr(app) + json.dumps(snapshot, ensure_ascii=False)
        assert SECRET not in text
        assert snapshot["api_key"] == "…wxyz"
        assert snapshot["state"] == "running" and snapshot["port"] == port
    assert SECRET not in "\n".join(app.events)


def test_api_key_argument_wins_over_environment(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENVIRONMENT_API_KEY", "from-env")
    app = local_app(port, api_key="from-arg", app=make_app(require_key="from-arg"))
    assert (app.api_key, app.api_key_source) == ("from-arg", "argument")
    with app:  # the health check sent the argument's key
        pass


def test_api_key_from_environment(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT_API_KEY", "from-env")
    env_before = dict(os.environ)
    app = local_app(port, app=make_app(require_key="from-env"))
    assert (app.api_key, app.api_key_source) == ("from-env", "ENVIRONMENT_API_KEY")
    with app:
        assert dict(os.environ) == env_before
    assert dict(os.environ) == env_before


def test_api_key_generated_and_environment_left_alone(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENVIRONMENT_API_KEY", raising=False)
    env_before = dict(os.environ)
    seen: list[dict[str, str]] = []
    app = local_app(port, app=make_app(seen=seen))
    other = local_app(free_port())
    assert app.api_key_source == "generated"
    assert len(app.api_key) >= 32 and app.api_key != other.api_key
    with app:
        assert dict(os.environ) == env_before
    assert dict(os.environ) == env_before
    assert "ENVIRONMENT_API_KEY" not in os.environ
    assert seen and seen[0]["x-api-key"] == app.api_key


def test_wrong_api_key_fails_fast_naming_the_fix(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENVIRONMENT_API_KEY", raising=False)
    app = local_app(port, app=make_app(require_key="right"), api_key="wrong",
                    health_check_timeout=30)
    with pytest.raises(RuntimeError) as info:
        app.start()
    assert isinstance(info.value, HealthCheckError)
    message = str(info.value)
    assert "HTTP 401" in message
    assert "ENVIRONMENT_API_KEY" in message and "api_key=" in message
    assert "wrong" not in message
    assert app.state is AppState.FAILED
    assert port_is_free(port)


# ---------------------------------------------------------------------------- stats


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_request_stats_are_counted(port: int) -> None:
    with local_app(port) as app:
        base = app.stats.count
        for _ in range(3):
            get(f"{app.url}/ok")
        get(f"{app.url}/boom")
        get(f"{app.url}/missing")
        wait_for(lambda: app.stats.count == base + 5, "5 more requests recorded")
        assert app.stats.errors == 1  # only the 500 counts as an error
        paths = [r.path for r in app.stats.recent]
        assert paths[-5:] == ["/ok", "/ok", "/ok", "/boom", "/missing"]
        statuses = [r.status for r in app.stats.recent][-2:]
        assert statuses == [500, 404]
        snapshot = app.snapshot()
        assert snapshot["requests"] == base + 5 and snapshot["errors"] == 1
        assert snapshot["mean_ms"] is not None


# ---------------------------------------------------------------------------- failures


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_health_timeout_names_last_status_and_leaves_nothing(
    port: int, serve_on: str
) -> None:
    # Warm up imports and caches so they do not count as leaks.
    async with local_app(free_port(), serve_on=serve_on):
        pass
    before = Resources.now()
    app = local_app(port, app=make_app(health_status=503), serve_on=serve_on,
                    health_check_timeout=0.3)
    with pytest.raises(RuntimeError) as info:
        await app.astart()
    assert isinstance(info.value, HealthCheckError)
    message = str(info.value)
    assert "did not become healthy within 0.3 s" in message
    assert "last: HTTP 503" in message
    assert "health_check_timeout" in message
    assert app.state is AppState.FAILED and app.url is None
    assert_nothing_left(before, app, port)


def test_health_timeout_in_sync_start_leaves_nothing(port: int) -> None:
    with local_app(free_port()):
        pass
    before = Resources.now()
    app = local_app(port, app=make_app(health_status=503), health_check_timeout=0.2)
    with pytest.raises(HealthCheckError, match="last: HTTP 503"):
        app.start()
    assert_nothing_left(before, app, port)
    # And the same instance starts fine once the app is healthy... on a new instance.
    with local_app(port) as again:
        assert again.port == port


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_lifespan_failure_is_a_clear_error_and_leaves_nothing(
    port: int, serve_on: str
) -> None:
    async with local_app(free_port(), serve_on=serve_on):
        pass
    before = Resources.now()
    app = local_app(port, app=make_app(startup_error="database unreachable"),
                    serve_on=serve_on)
    try:
        await app.astart()
    except SystemExit:  # pragma: no cover - the bug this guards against
        pytest.fail("SystemExit escaped from a failed lifespan startup")
    except RuntimeError as exc:
        assert isinstance(exc, ServerStartError)
        message = str(exc)
        assert "lifespan startup raised" in message
        assert "database unreachable" in message
        assert "Fix the app's startup hooks" in message
    else:  # pragma: no cover
        pytest.fail("start succeeded although the lifespan startup raised")
    assert app.state is AppState.FAILED
    assert_nothing_left(before, app, port)


def test_lifespan_failure_in_sync_start(port: int) -> None:
    app = local_app(port, app=make_app(startup_error="no GPU"))
    with pytest.raises(ServerStartError, match="no GPU"):
        app.start()
    assert port_is_free(port)
    assert app.state is AppState.FAILED


# ---------------------------------------------------------------------------- preconfigured


def test_preconfigured_returns_the_url_as_given(port: int) -> None:
    url = "https://tasks.example.com/team-a"
    with local_app(port, tunnel_mode="preconfigured", preconfigured_url=url) as app:
        assert app.url == url
        assert app.tunnel_mode == "preconfigured"
        assert app.local_url == f"http://127.0.0.1:{port}"
        assert get(f"{app.local_url}/ok").status_code == 200


def test_preconfigured_verification_sends_the_auth_header(port: int) -> None:
    seen: list[dict[str, str]] = []
    url = f"http://127.0.0.1:{port}"  # the app itself stands in for the public URL
    app = local_app(
        port,
        app=make_app(seen=seen),
        tunnel_mode="preconfigured",
        preconfigured_url=url,
        preconfigured_auth_header="X-Gateway-Token",
        preconfigured_auth_token="gw-secret",
        skip_tunnel_verification=False,
    )
    with app:
        assert app.url == url
    verified = [h for h in seen if "x-gateway-token" in h]
    assert verified and verified[-1]["x-gateway-token"] == "gw-secret"
    assert verified[-1]["x-api-key"] == app.api_key
    assert "gw-secret" not in repr(app) + json.dumps(app.snapshot(), ensure_ascii=False)


def test_preconfigured_verification_fails_with_wrong_token(port: int) -> None:
    app = local_app(
        port,
        tunnel_mode="preconfigured",
        preconfigured_url=f"http://127.0.0.1:{port}",
        preconfigured_auth_header="X-Gateway-Token",
        preconfigured_auth_token="not-the-token",
        skip_tunnel_verification=False,
    )
    with pytest.raises(TunnelVerificationError, match=r"does not reach the app.*HTTP 403"):
        app.start()
    assert app.state is AppState.FAILED
    assert port_is_free(port)


@pytest.mark.parametrize("suffix", ["/wrong-prefix", "unreachable"])
def test_preconfigured_verification_fails_clearly_on_a_wrong_url(
    port: int, suffix: str
) -> None:
    if suffix == "unreachable":
        url = f"http://127.0.0.1:{free_port()}"
        expected = "ConnectError"
    else:
        url = f"http://127.0.0.1:{port}{suffix}"
        expected = "last: HTTP 404"
    app = local_app(
        port,
        tunnel_mode="preconfigured",
        preconfigured_url=url,
        skip_tunnel_verification=False,
        health_check_timeout=0.3,
    )
    with pytest.raises(RuntimeError) as info:
        app.start()
    assert isinstance(info.value, TunnelVerificationError)
    message = str(info.value)
    assert url in message and expected in message
    assert "skip_tunnel_verification=True" in message
    assert app.state is AppState.FAILED and app.url is None
    assert port_is_free(port)


def test_preconfigured_wrong_url_is_not_checked_when_verification_is_skipped(port: int) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with local_app(port, tunnel_mode="preconfigured", preconfigured_url=url) as app:
        assert app.url == url


# ---------------------------------------------------------------------------- synthtunnel


def test_synthtunnel_without_key_fails_before_binding(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNTH_API_KEY", raising=False)
    started: list[bool] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append(True)
        yield

    # Hold the port with a socket that is not ours: had the runner tried to bind it, it
    # would raise PortInUseError instead of the SYNTH_API_KEY error.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        app = InProcessTaskApp(app=FastAPI(lifespan=lifespan), port=port,
                               auto_find_port=False)
        assert app.tunnel_mode == "synthtunnel"  # the default
        with pytest.raises(RuntimeError) as info:
            app.start()
    assert isinstance(info.value, TunnelError)
    assert not isinstance(info.value, PortInUseError)
    assert "SYNTH_API_KEY is not set" in str(info.value)
    assert "tunnel_mode='local'" in str(info.value)
    assert started == []
    assert app.state is AppState.FAILED and app.stats.count == 0
    assert port_is_free(port)


# ---------------------------------------------------------------------------- other inputs


def test_config_factory_input_serves_the_contract(port: int) -> None:
    from taskapp_notebook import TaskAppConfig

    calls: list[int] = []

    def factory() -> TaskAppConfig:
        calls.append(1)
        return TaskAppConfig(app_id="demo", name="Demo", description="d")

    with local_app(port, app=None, config_factory=factory, api_key="k-123") as app:
        assert calls == [1]
        assert get(f"{app.url}/health", headers={"X-API-Key": "k-123"}).status_code == 200
        assert get(f"{app.url}/health", headers={"X-API-Key": "other"}).status_code in (
            401,
            403,
        )


def test_config_input(port: int) -> None:
    from taskapp_notebook import TaskAppConfig

    config = TaskAppConfig(app_id="demo", name="Demo", description="d")
    with local_app(port, app=None, config=config) as app:
        assert get(f"{app.url}/health", headers={"X-API-Key": app.api_key}).status_code == 200


def test_config_factory_that_raises_is_a_clear_error(port: int) -> None:
    def factory() -> Any:
        raise KeyError("missing dataset")

    app = local_app(port, app=None, config_factory=factory)
    with pytest.raises(ValueError, match=r"config_factory .* raised KeyError: 'missing dataset'"):
        app.start()
    assert port_is_free(port)


def test_task_app_path_input(port: int, tmp_path: Path) -> None:
    path = tmp_path / "my_task_app.py"
    path.write_text(
        "from fastapi import FastAPI\n"
        "app = FastAPI()\n"
        "@app.get('/health')\n"
        "def health():\n"
        "    return {'healthy': True}\n"
    )
    with local_app(port, app=None, task_app_path=str(path)) as app:
        assert app.task_app_path == path.resolve()
        assert app.name == "my_task_app"
        assert get(f"{app.url}/health").json() == {"healthy": True}


def test_start_error_is_a_runtime_error() -> None:
    assert issubclass(StartError, RuntimeError)
    assert issubclass(InvalidParameterError, ValueError)
    assert issubclass(TaskAppNotFoundError, FileNotFoundError)


@pytest.mark.timeout(60)
async def test_sync_start_on_a_loop_apps_loop_takes_its_port_without_deadlock(port: int) -> None:
    # The in-process holder is stopped in the caller's context: from the server thread it
    # would wait for this very loop, which is blocked in start().
    first = InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on="loop", port=port,
                             api_key="k")
    await first.astart()
    second = InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on="thread",
                              port=port, auto_find_port=False, api_key="k")
    second.start()
    try:
        assert first.state is AppState.STOPPED
        assert second.is_running and second.port == port
    finally:
        second.stop()


async def test_astop_waits_for_a_stop_already_in_progress(port: int) -> None:
    app = InProcessTaskApp(app=make_app(), tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k")
    await app.astart()
    first = asyncio.create_task(app.astop())
    await asyncio.sleep(0)  # the first stop has begun
    assert app.state is AppState.STOPPING
    await app.astop()  # returns only once the first one has finished
    assert app.state is AppState.STOPPED
    await first


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_app_without_health_route_fails_at_once_and_leaves_nothing(
    serve_on: str, port: int
) -> None:
    no_health = FastAPI()  # no /health: a 404 is a final answer, not worth 30 s of polling
    app = InProcessTaskApp(app=no_health, tunnel_mode="local", serve_on=serve_on, port=port,
                           api_key="k", health_check_timeout=30.0)
    with pytest.raises(RuntimeError, match=r"no GET /health route \(HTTP 404\)") as info:
        await app.astart()
    assert "30 s" not in str(info.value)
    assert app.state is AppState.FAILED
    assert port_is_free(port)
