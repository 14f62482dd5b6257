"""Many start/stop cycles leave no threads, file descriptors or listening sockets behind."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import warnings
from collections.abc import Iterator

import httpx
import psutil
import pytest
from fastapi import FastAPI
from support import free_port, health_app, port_is_free

from taskapp_notebook import InProcessTaskApp, registry

CYCLES = 30




def listening_ports() -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }


class Baseline:
    """Threads, fds and listening sockets of this process, taken after a warm-up cycle."""

    def __init__(self) -> None:
        gc.collect()
        self.threads = set(threading.enumerate())
        self.fds = psutil.Process().num_fds()
        self.listening = listening_ports()

    def check(self, port: int) -> None:
        gc.collect()
        new_threads = set(threading.enumerate()) - self.threads
        assert not new_threads, sorted(t.name for t in new_threads)
        assert psutil.Process().num_fds() == self.fds
        assert listening_ports() == self.listening
        assert port not in listening_ports()
        assert port_is_free(port)


@pytest.fixture
def app_port() -> Iterator[int]:
    port = free_port()
    yield port
    assert not [a for a in registry.running() if a.port == port]


def test_sync_with_in_thread_mode_does_not_leak(app_port: int) -> None:
    app = InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local",
                           auto_find_port=False, serve_on="thread")
    with app:  # warm-up: imports, SSL context, first-use caches
        pass
    baseline = Baseline()
    with httpx.Client(trust_env=False) as client:
        for _ in range(CYCLES):
            with app:
                assert client.get(f"{app.url}/health").status_code == 200
                assert app.port == app_port
            assert port_is_free(app_port)
    baseline.check(app_port)


def test_start_stop_in_thread_mode_with_fresh_instances_does_not_leak(app_port: int) -> None:
    with InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local"):
        pass
    baseline = Baseline()
    for _ in range(CYCLES):
        app = InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local",
                               auto_find_port=False)
        app.start()
        assert app.is_running
        app.stop()
    baseline.check(app_port)


async def test_async_with_in_loop_mode_does_not_leak(app_port: int) -> None:
    app = InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local",
                           auto_find_port=False, serve_on="loop")
    async with app:
        pass
    baseline = Baseline()
    tasks_before = asyncio.all_tasks()
    async with httpx.AsyncClient(trust_env=False) as client:
        for _ in range(CYCLES):
            async with app:
                assert (await client.get(f"{app.url}/health")).status_code == 200
            assert port_is_free(app_port)
    assert asyncio.all_tasks() == tasks_before
    baseline.check(app_port)


async def test_async_with_in_thread_mode_does_not_leak(app_port: int) -> None:
    app = InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local",
                           auto_find_port=False, serve_on="thread")
    async with app:
        pass
    baseline = Baseline()
    tasks_before = asyncio.all_tasks()
    for _ in range(CYCLES):
        async with app:
            assert app.is_running
    assert asyncio.all_tasks() == tasks_before
    baseline.check(app_port)


def test_failed_starts_do_not_leak(app_port: int) -> None:
    broken = FastAPI()  # no /health: a 404, which fails the start at once

    app = InProcessTaskApp(app=broken, port=app_port, tunnel_mode="local",
                           auto_find_port=False, health_check_timeout=0.05)
    with pytest.raises(RuntimeError):
        app.start()
    baseline = Baseline()
    for _ in range(10):
        with pytest.raises(RuntimeError, match=r"no GET /health route \(HTTP 404\)"):
            app.start()
    baseline.check(app_port)


@pytest.mark.parametrize("serve_on", ["thread", "loop"])
async def test_a_client_connecting_just_before_stop_leaves_no_socket(
    app_port: int, serve_on: str
) -> None:
    """asyncio drops a socket it accepted when its server closes before the transport is
    made; stop() must let such connections register so it can close them."""
    app = InProcessTaskApp(app=health_app(), port=app_port, tunnel_mode="local",
                           auto_find_port=False, serve_on=serve_on)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(CYCLES):
            await app.astart()
            with socket.create_connection(("127.0.0.1", app_port)):
                await app.astop()
            gc.collect()
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
    assert port_is_free(app_port)
