"""Port conflicts against real foreign processes (tests/scripts/foreign_listener.py).

auto_find_port=True moves up to the next free port; auto_find_port=False frees the port
(SIGTERM, then SIGKILL for a process that ignores it), stops another InProcessTaskApp of this
process that holds it, never touches mere clients, and raises a PortInUseError naming the
holder when it cannot free the port.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from support import free_port, health_app, port_is_free

from taskapp_notebook import AppState, InProcessTaskApp, PortInUseError, registry
from taskapp_notebook.ports import (
    bind_first_free,
    bind_listener,
    listening_holders,
    validate_host,
    validate_port,
)

FOREIGN = Path(__file__).parent / "scripts" / "foreign_listener.py"




class Foreign:
    """A foreign process started by a test (``foreign_listener.py``); always reaped.

    It runs under a ``/bin/sh`` parent that prints how it ended (``exit 143`` = SIGTERM,
    ``exit 137`` = SIGKILL): psutil reaps direct children itself, which would hide the
    signal from ``Popen.wait``.
    """

    def __init__(self, *args: str) -> None:
        self.shell = subprocess.Popen(
            ["/bin/sh", "-c", '"$@"; echo "exit $?"', "sh", sys.executable, str(FOREIGN), *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.shell.stdout is not None
        line = self.shell.stdout.readline().split()
        assert line[:1] == ["ready"], f"foreign process failed to start: {line!r}"
        self.pid = int(line[1])

    def alive(self) -> bool:
        try:
            return bool(psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False

    def exit_status(self, timeout: float = 10.0) -> int:
        """Wait for the process to end; its shell-style status (128 + signal if killed)."""
        out, _ = self.shell.communicate(timeout=timeout)
        return int(out.split()[-1])

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.shell.communicate(timeout=10)


@pytest.fixture
def foreign() -> Iterator[Callable[..., Foreign]]:
    started: list[Foreign] = []

    def start(*args: str) -> Foreign:
        proc = Foreign(*args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def task_app(port: int, **kwargs: object) -> InProcessTaskApp:
    return InProcessTaskApp(app=health_app(), port=port, tunnel_mode="local", **kwargs)  # type: ignore[arg-type]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- auto_find_port=True


def test_auto_find_port_moves_to_the_next_free_port_upward(
    port: int, foreign: Callable[..., Foreign], caplog: pytest.LogCaptureFixture
) -> None:
    holder = foreign("listen", str(port))
    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    with task_app(port) as app:
        assert app.port > port
        assert app.requested_port == port
        for between in range(port + 1, app.port):
            assert not port_is_free(between)  # skipped only busy ports
        assert app.url == f"http://127.0.0.1:{app.port}"
        assert httpx.get(f"{app.url}/health", trust_env=False).status_code == 200
    assert holder.alive(), "auto_find_port=True must not touch the holder"
    assert any(
        f"Port {port} on 127.0.0.1 is in use; using port {app.port} instead" in w
        for w in warnings_of(caplog)
    ), warnings_of(caplog)


def test_auto_find_port_keeps_a_free_port_without_warning(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    with task_app(port) as app:
        assert app.port == port
    assert warnings_of(caplog) == []


def test_restart_with_auto_find_port_tries_the_requested_port_again(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    app = task_app(port)
    holder = foreign("listen", str(port))
    with app:
        assert app.port != port
    holder.close()
    assert port_is_free(port)
    with app:
        assert app.port == port


# ---------------------------------------------------------------------------- auto_find_port=False


def test_no_auto_find_port_terminates_a_foreign_listener(
    port: int, foreign: Callable[..., Foreign], caplog: pytest.LogCaptureFixture
) -> None:
    holder = foreign("listen", str(port))
    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    with task_app(port, auto_find_port=False) as app:
        assert app.port == port
        assert httpx.get(f"{app.url}/health", trust_env=False).status_code == 200
        assert holder.exit_status() == 128 + signal.SIGTERM
    warnings = warnings_of(caplog)
    assert any(f"Terminating pid {holder.pid}" in w and "foreign_listener.py" in w
               for w in warnings), warnings
    assert not any("SIGKILL" in w for w in warnings), warnings


def test_no_auto_find_port_kills_a_listener_that_ignores_sigterm(
    port: int, foreign: Callable[..., Foreign], caplog: pytest.LogCaptureFixture
) -> None:
    holder = foreign("listen", str(port), "--ignore-sigterm")
    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    with task_app(port, auto_find_port=False) as app:
        assert app.port == port
        assert holder.exit_status() == 128 + signal.SIGKILL
    warnings = warnings_of(caplog)
    assert any(f"Terminating pid {holder.pid}" in w for w in warnings), warnings
    assert any(f"pid {holder.pid}" in w and "ignored SIGTERM; sending SIGKILL" in w
               for w in warnings), warnings


def test_a_client_connected_to_the_port_is_never_killed(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    listener = foreign("listen", str(port))
    client = foreign("connect", str(port))
    assert [h.pid for h in listening_holders(port)] == [listener.pid]
    with task_app(port, auto_find_port=False) as app:
        assert app.port == port
        assert listener.exit_status() == 128 + signal.SIGTERM
        assert client.alive()
    assert client.alive()


def test_a_client_of_our_own_app_is_never_killed(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    first = task_app(port, auto_find_port=False).start()
    client = foreign("connect", str(port))
    first.stop()
    # The client's half of the old connection is still there; the port is free to bind.
    with task_app(port, auto_find_port=False) as app:
        assert app.port == port
        assert client.alive()


def test_a_port_held_by_another_task_app_stops_that_instance(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskapp_notebook")
    first = task_app(port, auto_find_port=False, name="first").start()
    second = task_app(port, auto_find_port=False, name="second")
    with second:
        assert second.port == port
        assert first.state is AppState.STOPPED
        assert registry.running()[-1] is second and first not in registry.running()
        assert httpx.get(f"{second.url}/health", trust_env=False).status_code == 200
    assert any(f"Port {port} is held by" in w and "'first'" in w and "stopping it" in w
               for w in warnings_of(caplog)), warnings_of(caplog)
    assert port_is_free(port)


async def test_a_port_held_by_a_loop_mode_task_app_stops_it(port: int) -> None:
    first = task_app(port, auto_find_port=False, serve_on="loop")
    await first.astart()
    async with task_app(port, auto_find_port=False, serve_on="thread") as second:
        assert second.port == port
        assert first.state is AppState.STOPPED


def test_a_listener_in_this_process_that_is_not_ours_is_an_error(port: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        app = task_app(port, auto_find_port=False)
        with pytest.raises(RuntimeError) as info:
            app.start()
        assert sock.fileno() != -1  # not closed behind our back
    assert isinstance(info.value, PortInUseError)
    message = str(info.value)
    assert f"Port {port} on '127.0.0.1' is in use by this process (pid {os.getpid()})" in message
    assert "auto_find_port=True" in message
    assert app.state is AppState.FAILED


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to start a process as another user")
def test_a_listener_of_another_user_is_named_and_left_alone(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    holder = foreign("listen", str(port), "--setuid", "65534")  # nobody
    app = task_app(port, auto_find_port=False)
    with pytest.raises(PortInUseError) as info:
        app.start()
    message = str(info.value)
    assert f"pid {holder.pid}" in message
    assert "foreign_listener.py" in message  # the command line
    assert "another user" in message and "auto_find_port=True" in message
    assert holder.alive()


def test_listening_holders_lists_listeners_not_clients(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    listener = foreign("listen", str(port))
    foreign("connect", str(port))
    holders = listening_holders(port)
    assert [h.pid for h in holders] == [listener.pid]
    holder = holders[0]
    assert holder.uid == os.getuid()
    assert "foreign_listener.py" in holder.cmdline
    assert holder.describe().startswith(f"pid {listener.pid} (")
    assert psutil.pid_exists(listener.pid)


# ---------------------------------------------------------------------------- ports.py units


def test_bind_listener_refuses_a_live_listener(port: int) -> None:
    with bind_listener("127.0.0.1", port) as first:
        assert first.getsockname() == ("127.0.0.1", port)
        with pytest.raises(OSError):
            bind_listener("127.0.0.1", port)


def test_bind_first_free_returns_the_requested_port_when_free(port: int) -> None:
    with bind_first_free("localhost", port) as sock:
        assert sock.getsockname() == ("127.0.0.1", port)


def test_bind_first_free_at_the_top_of_the_range_is_a_clear_error() -> None:
    top = 65535
    try:
        holder = bind_listener("127.0.0.1", top)
    except OSError:
        pytest.skip("port 65535 is busy on this machine")
    with holder, pytest.raises(PortInUseError, match=r"No free port between 65535 and 65535"):
        bind_first_free("127.0.0.1", top)


@pytest.mark.parametrize("value", [1024, 8114, 65535])
def test_validate_port_accepts_the_range(value: int) -> None:
    assert validate_port(value) == value


def test_validate_host_names_the_allowed_hosts() -> None:
    with pytest.raises(ValueError, match=r"'127\.0\.0\.1', 'localhost', '0\.0\.0\.0'"):
        validate_host("10.0.0.1")


def test_free_port_helper_is_free() -> None:
    assert port_is_free(free_port())


def test_moving_off_the_default_port_is_info_off_a_chosen_one_a_warning(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed logs port conflicts at WARNING; a port nobody chose (the default 8114)
    moving is only INFO, so a notebook's happy path shows no red line."""
    from taskapp_notebook.ports import DEFAULT_PORT, bind_first_free

    assert InProcessTaskApp(app=health_app(), tunnel_mode="local").port_pinned is False
    assert task_app(port).port_pinned is True
    assert task_app(DEFAULT_PORT).port_pinned is False
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()
    caplog.set_level(logging.INFO, logger="taskapp_notebook")
    try:
        for pinned, level in ((False, logging.INFO), (True, logging.WARNING)):
            caplog.clear()
            with bind_first_free("127.0.0.1", port, pinned=pinned) as sock:
                assert sock.getsockname()[1] != port
            (record,) = [r for r in caplog.records if "is in use; using port" in r.message]
            assert record.levelno == level
    finally:
        holder.close()


def test_restart_keeps_the_actual_port_and_key(
    port: int, foreign: Callable[..., Foreign]
) -> None:
    app = task_app(port)
    holder = foreign("listen", str(port))
    app.start()
    try:
        moved, key = app.port, app.api_key
        assert moved != port
        holder.close()
        app.restart()
        assert app.is_running and app.port == moved and app.api_key == key
    finally:
        app.stop()


async def test_arestart_and_astop_all(port: int) -> None:
    from taskapp_notebook import astop_all

    first, second = task_app(port, serve_on="loop"), task_app(free_port(), serve_on="thread")
    await first.astart()
    await second.astart()
    key = first.api_key
    await first.arestart()
    assert first.is_running and first.port == port and first.api_key == key
    await astop_all(timeout=10)
    assert not first.is_running and not second.is_running
    assert port_is_free(port) and port_is_free(second.port)
