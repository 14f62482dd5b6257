"""Stops from unusual places: an idle loop, a cancelled caller, a closed loop at exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from support import free_port, health_app, port_is_free, wait_for

from taskapp_notebook import AppState, InProcessTaskApp
from taskapp_notebook.errors import HealthCheckError
from taskapp_notebook.relay import RelayConfig, RelayServer


def test_astop_from_another_loop_while_the_apps_loop_is_idle() -> None:
    port = free_port()
    own_loop = asyncio.new_event_loop()
    app = InProcessTaskApp(app=health_app(), tunnel_mode="local", serve_on="loop", port=port,
                           api_key="k")
    try:
        own_loop.run_until_complete(app.astart())  # the app's loop now sits idle
        asyncio.run(asyncio.wait_for(app.astop(), 20))
        assert app.state is AppState.STOPPED
        assert port_is_free(port)
    finally:
        own_loop.close()


async def test_cancelled_astop_still_finishes_the_stop() -> None:
    port = free_port()
    app = InProcessTaskApp(app=health_app(), tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k")
    await app.astart()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(app.astop(), 0.0001)
    await asyncio.to_thread(wait_for, lambda: app.state is AppState.STOPPED)
    assert app.state is AppState.STOPPED
    assert app._thread is None  # the server thread was closed, not leaked
    assert port_is_free(port)
    await app.astart()  # and it can start again
    assert app.is_running
    await app.astop()


def test_stop_after_the_loop_closed_deletes_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    with RelayServer(api_keys=["relay-key"]) as relay:
        monkeypatch.setenv("SYNTH_BACKEND_URL", relay.url)
        monkeypatch.setenv("SYNTH_API_KEY", "relay-key")
        port = free_port()
        app = InProcessTaskApp(app=health_app(), serve_on="loop", port=port, api_key="k")

        async def start_and_leave() -> str:
            await app.astart()
            lease = getattr(app.tunnel, "lease", None)
            return str(getattr(lease, "lease_id", ""))

        lease_id = asyncio.run(start_and_leave())  # asyncio.run closes the app's loop
        assert lease_id and app.is_running
        app.stop()  # what atexit does: the loop is gone, the tunnel must still close
        assert app.state is AppState.STOPPED and port_is_free(port)
        gone = httpx.get(f"{relay.url}/api/v1/synthtunnel/leases/{lease_id}", trust_env=False,
                         headers={"Authorization": "Bearer relay-key"})
        assert gone.status_code in (404, 410)


def test_stop_while_starting_cancels_the_start_and_leaves_nothing() -> None:
    import contextlib
    import threading

    from taskapp_notebook import registry

    release = threading.Event()

    @contextlib.asynccontextmanager
    async def slow_startup(app: FastAPI):  # type: ignore[no-untyped-def]
        while not release.is_set():
            await asyncio.sleep(0.01)
        yield

    slow = FastAPI(lifespan=slow_startup)
    port = free_port()
    app = InProcessTaskApp(app=slow, tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            app.start()
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        assert wait_for(lambda: app.state is AppState.STARTING and not port_is_free(port))
        app.stop()  # e.g. stop_all at kernel shutdown, mid-start
    finally:
        release.set()
        starter.join(30)
    assert errors and "stopped while starting" in str(errors[0])
    assert app.state is AppState.FAILED and app._thread is None
    assert app not in registry.running()
    assert port_is_free(port)


# -- the stop grace: stuck handlers are cancelled quietly once it ends -----------------------


def _stuck_app(in_handler: threading.Semaphore, unwound: list[str]) -> FastAPI:
    """A task app with two handlers that never finish on their own: one asleep for an hour,
    one looping on awaits (nothing blocks the loop). Each records that it was unwound."""
    stuck = FastAPI()

    @stuck.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @stuck.get("/sleep")
    async def sleep_forever() -> None:
        in_handler.release()
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.append("sleep")

    @stuck.get("/spin")
    async def spin_forever() -> None:
        in_handler.release()
        try:
            while True:
                await asyncio.sleep(0)
        finally:
            unwound.append("spin")

    return stuck


def _raw_get(port: int, path: str) -> bytes:
    """GET ``path`` on a raw socket; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\n\r\n".encode())
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
        return received


def _noisy(records: list[logging.LogRecord], stderr: str) -> list[str]:
    """ERROR records, records with a traceback, and tracebacks on stderr."""
    found = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records
             if r.levelno >= logging.ERROR or r.exc_info]
    if "Traceback" in stderr or "CancelledError" in stderr:
        found.append(f"stderr: {stderr}")
    return found


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
def test_stop_cancels_stuck_handlers_after_the_grace_quietly(
    serve_on: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    in_handler, unwound = threading.Semaphore(0), []
    port = free_port()
    app = InProcessTaskApp(app=_stuck_app(in_handler, unwound), tunnel_mode="local",
                           serve_on=serve_on, port=port, api_key="k",  # type: ignore[arg-type]
                           stop_grace=0.2)
    caplog.set_level(logging.DEBUG)

    async def start_call_stop(callers: concurrent.futures.Executor) -> list[bytes]:
        await app.astart()
        calls = [callers.submit(_raw_get, port, path) for path in ("/sleep", "/spin")]
        for _ in calls:
            assert await asyncio.to_thread(in_handler.acquire, timeout=30)
        await app.astop()
        return [await asyncio.wrap_future(call) for call in calls]

    with concurrent.futures.ThreadPoolExecutor(2) as callers:
        answers = asyncio.run(start_call_stop(callers))
    assert app.serve_on == serve_on
    assert app.state is AppState.STOPPED and port_is_free(port)
    assert sorted(unwound) == ["sleep", "spin"]  # both handlers were cancelled and unwound
    for answer in answers:  # each caller got a clean answer, then the connection closed
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"stopped" in answer
    assert _noisy(caplog.records, capfd.readouterr().err) == []
    assert any("cancelled 2 request(s)" in line for line in app.events)
    assert any(r.levelno == logging.DEBUG and "cancelled" in r.getMessage()
               for r in caplog.records)


def test_the_port_is_free_during_the_grace_and_a_handler_finishing_in_it_is_answered() -> None:
    release = threading.Event()
    in_handler = threading.Semaphore(0)
    slow = FastAPI()

    @slow.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @slow.get("/slow")
    async def finish_when_released() -> dict[str, str]:
        in_handler.release()
        while not release.is_set():
            await asyncio.sleep(0.005)
        return {"done": "yes"}

    port = free_port()
    app = InProcessTaskApp(app=slow, tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k", stop_grace=120)
    app.start()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        call = pool.submit(_raw_get, port, "/slow")
        assert in_handler.acquire(timeout=30)
        stopping = pool.submit(app.stop)
        try:
            assert wait_for(lambda: port_is_free(port))  # listener closed, grace running
            assert not stopping.done() and not call.done()
            assert app.state is AppState.STOPPING
        finally:
            release.set()
        stopping.result(60)
        answer = call.result(60)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"done":"yes"}')
    assert app.state is AppState.STOPPED
    assert not any("cancelled" in line for line in app.events)


def test_a_start_whose_health_check_hangs_undoes_itself_quietly(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    unwound: list[str] = []
    hangs = FastAPI()

    @hangs.get("/health")
    async def never_answers() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            unwound.append("health")

    port = free_port()
    app = InProcessTaskApp(app=hangs, tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k", health_check_timeout=0.3, stop_grace=60)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HealthCheckError, match="did not become healthy"):
        app.start()  # a grace of 60 s does not apply: the app was never in service
    assert app.state is AppState.FAILED and app._thread is None
    assert port_is_free(port)
    assert unwound and set(unwound) == {"health"}  # the hung checks were cancelled
    assert _noisy(caplog.records, capfd.readouterr().err) == []


@pytest.mark.parametrize("grace", [-1, float("nan"), float("inf"), "1", True])
def test_stop_grace_must_be_a_finite_number_of_seconds(grace: object) -> None:
    with pytest.raises(ValueError, match="stop_grace"):
        InProcessTaskApp(app=health_app(), tunnel_mode="local", stop_grace=grace)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="stop_grace"):
        RelayConfig(stop_grace=grace)  # type: ignore[arg-type]


def test_a_response_cut_by_the_grace_is_dropped_quietly(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from fastapi.responses import StreamingResponse

    in_handler = threading.Semaphore(0)
    streams = FastAPI()

    @streams.get("/health")
    async def health() -> dict[str, bool]:
        return {"healthy": True}

    @streams.get("/stream")
    async def first_chunk_then_stuck() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first chunk\n"
            in_handler.release()
            await asyncio.sleep(3600)
            yield b"never sent\n"

        return StreamingResponse(body(), media_type="text/plain")

    port = free_port()
    app = InProcessTaskApp(app=streams, tunnel_mode="local", serve_on="thread", port=port,
                           api_key="k", stop_grace=0.1)
    caplog.set_level(logging.DEBUG)
    app.start()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(_raw_get, port, "/stream")
        assert in_handler.acquire(timeout=30)
        app.stop()
        answer = call.result(30)
    # The head and the first chunk arrived; the body was never completed (no final chunk),
    # so the caller can tell it was cut, and the connection is closed.
    assert answer.startswith(b"HTTP/1.1 200 ") and b"first chunk" in answer
    assert b"never sent" not in answer and not answer.endswith(b"0\r\n\r\n")
    assert app.state is AppState.STOPPED and port_is_free(port)
    assert _noisy(caplog.records, capfd.readouterr().err) == []
    assert any("cancelled 1 request(s)" in line for line in app.events)
