"""Stops from unusual places: an idle loop, a cancelled caller, a closed loop at exit."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from support import free_port, health_app, port_is_free, wait_for

from taskapp_notebook import AppState, InProcessTaskApp
from taskapp_notebook.relay import RelayServer


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
